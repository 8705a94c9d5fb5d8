"""The book's models: the CIFAR ResNet family (`normlab.models.resnet`) and a small GPT-style
Transformer (`normlab.models.transformer`). Import from the submodules."""
