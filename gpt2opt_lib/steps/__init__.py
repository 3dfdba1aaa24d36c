"""One module per notebook: the calls its cells make (s01_distill ... s05_flash_quant), what they share
(common), and the setup every stage does the same way (context)."""
