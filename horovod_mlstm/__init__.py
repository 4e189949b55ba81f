"""horovod_mlstm: byte-level mLSTM language models trained with TensorFlow 2 + Horovod."""
