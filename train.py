"""Train a two-tower model: ``python train.py fit --config configs/default.yaml [--key value ...]``.

Thin wrapper: everything lives in :mod:`twotower.train`.
"""

from twotower.train import main

if __name__ == "__main__":
    main()
