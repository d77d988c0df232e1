"""The commands the installed package runs, as thin absl mains.

  python -m lorajax.cli.train     train and evaluate one config (lorajax-train)
  python -m lorajax.cli.sweep     a config's sweep(add), then its report
                                  (lorajax-sweep)
  python -m lorajax.cli.profile   memory, time and FLOPs per batch size
                                  (lorajax-profile)

Each module parses flags and calls the library; the console scripts in
parentheses are the same mains, installed by ``pip install``.
"""
