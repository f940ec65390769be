"""The top of the pipeline, *cli*: the ``cmrtool`` command, a thin client over :mod:`cmrtool.api`.

- :mod:`~cmrtool.cli.app`: the Typer app, one small function per command;
- :mod:`~cmrtool.cli.main`: the one error boundary (``error:`` / ``hint:``, exit codes, signals);
- :mod:`~cmrtool.cli.output`: results on stdout (a table or one JSON document), logs on stderr;
- :mod:`~cmrtool.cli.render`: Rich tables of the reports;
- :mod:`~cmrtool.cli.tables`: tables that stay readable in 80 columns.

Nothing below this package imports it (DESIGN §8; STYLE: a command parses, calls, renders).
"""
