"""papm_core: the framework-independent ML core of federated PAPM.

One module per stage, each with a plain entry function:

- ``data``       : load_dataset(source) -> Dataset (uint8, cached), splits and shards
- ``loader``     : on-device batches with GPU/CPU-side augmentation
- ``models``     : ResNet18 built from an explicit width spec
- ``checkpoint`` : save/load for every model the project produces
- ``train``      : train(cfg) -> TrainResult (the base model)
- ``evaluate``   : evaluate(model, split) -> metrics, latency

Example: ``papm train --width 0.25 --epochs 10 --data ../shared/data/cifar10-jpeg75.tar.xz``
"""

__version__ = "0.1.0"
