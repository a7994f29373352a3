"""star_train: the STAR curriculum (CKD then Sim-RL) on one GPU. Early: a CKD demo."""
