"""The command line: ``pvt-lightning train | evaluate | predict | export | compare`` (entry points wire, they do not compute)."""
