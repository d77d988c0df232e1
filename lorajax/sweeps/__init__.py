"""Sweeps declared in a config file's ``sweep(add)``: expand, run, report.

  grid.expand         the runs of a sweep, each one command line
  runner.run_sweep    run them one after another (skip, resume, die together)
  report.write_report results.csv, results_by_config.csv, results.md,
                      results.tex and the plots of a sweep folder
  aggregate.group     runs grouped by configuration, over seeds
  stats               mean, std, 95% t intervals, paired differences
  verdicts            what the report may claim; the degenerate-sweep flag
  tables.latex        results.tex
  plots.plot_all      metric vs rank / params, the heatmap (PNG + PDF)
  curve_plots         learning curves over steps and tokens (PNG + PDF)

The command is ``python -m lorajax.cli.sweep``.
"""
