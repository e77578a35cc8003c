"""Training configs: each module's get_config() returns an ml_collections ConfigDict.

`base.py` holds every field with its default; other configs import it and change a few fields.
"""
