"""The commands the installed package runs, as thin absl mains.

  python -m lorajax.cli.train     train and evaluate one config (lorajax-train)
  python -m lorajax.cli.sweep     a config's sweep(add), then its report
                                  (lorajax-sweep)
  python -m lorajax.cli.profile   memory, time and FLOPs per batch size
                                  (lorajax-profile)
  python -m lorajax.cli.evaluate  score a finished run's adapter on one split,
                                  config read from its workdir
                                  (lorajax-evaluate)
  python -m lorajax.cli.export    write a finished run's adapter (lorajax,
                                  peft or merged), no data read
                                  (lorajax-export)

Each module parses flags and calls the library; the console scripts in
parentheses are the same mains, installed by ``pip install``.
"""
