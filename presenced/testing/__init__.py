"""Test support for presenced and for projects that test against it.

Owns the MongoDB emulator (``presenced.testing.mongo``) and the Rocket.Chat traffic
simulator. Installed with the ``presenced[testing]`` extra. The daemon must never import
this package.
"""
