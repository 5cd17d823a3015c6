"""Label conventions shared by the datasets, the losses and evaluation."""

# The label of a position that is not trained on: prompts, padding, masked EOD, the last token.
# torch's cross_entropy default and Megatron's loss mask 0; preprocessed SFT data stores it too.
IGNORE_INDEX = -100
