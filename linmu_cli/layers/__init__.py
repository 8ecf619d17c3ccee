"""M-MATE layers: token layout, Flex-MA, Local-Swin, the fused block and its decode cache."""
