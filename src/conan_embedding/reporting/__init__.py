"""Reporting: what a run leaves for people to read, rendered from facts other layers produced.

- :mod:`.card`  the model card (``README.md`` + ``conan_card.json``) in every saved model folder

The layer sits above training and evaluation (it renders their configs, data and scores) and
below serving, experiments and the CLI, which call it (docs/architecture.md).
"""
