"""The book's models: the CIFAR ResNet family (`normlab.models.resnet`), a small GPT-style
Transformer (`normlab.models.transformer`) and a small LLaMA-style decoder (`normlab.models.llama`).
Import from the submodules."""
