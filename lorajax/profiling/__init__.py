"""Profiles of a config's train step: memory, time and FLOPs per batch size.

  step_profile.profile    each batch size in a fresh subprocess
  step_profile.markdown   the table; step_profile.plot the figure

The command is ``python -m lorajax.cli.profile``.
"""
