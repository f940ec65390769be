"""``python -m cmrtool`` (also what ``torchrun -m cmrtool`` runs).

``-m`` puts the current directory first on ``sys.path``; it is removed before anything else is
imported, so no ``*.py`` beside the user's files can shadow a module (:mod:`cmrtool.io.safety`).
Signal handling is installed next, before torch is imported (:mod:`cmrtool.entry`).
"""

from cmrtool.io.safety import drop_cwd_from_path

drop_cwd_from_path()

from cmrtool.entry import run  # noqa: E402

if __name__ == "__main__":
    run()
