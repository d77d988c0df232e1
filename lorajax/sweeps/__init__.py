"""Sweeps declared in a config file's ``sweep(add)``: expand, run, report.

  grid.expand         the runs of a sweep, each one command line
  runner.run_sweep    run them one after another (skip, resume, die together)
  report.write_report results.csv, results.md and the plots of a sweep folder
  plots.plot_all      the PNG plots of the report

The command is ``python -m lorajax.cli.sweep``.
"""
