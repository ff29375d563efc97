"""Vision for the Ministral 3 children: the parent's frozen Pixtral encoder, a trainable Mistral3 projector per
child, image preprocessing and the ``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` token layout, the combined megatron
model, and Mistral3ForConditionalGeneration checkpoints in and out."""
