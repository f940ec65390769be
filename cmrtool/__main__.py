"""``python -m cmrtool`` (also what ``torchrun -m cmrtool`` runs)."""

from cmrtool.cli import run

if __name__ == "__main__":
    run()
