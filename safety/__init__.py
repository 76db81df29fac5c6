"""Safety: envelope, guard on every actuation, dry run, monitors, latched trips, e-stop, audit.

These are software interlocks layered *above* the hardware ones: the bench's
hardware e-stop never depends on labbridge.
"""
