"""Fast paths of the Sequencer modules: the native LSTM recurrence (C++), the stacked recurrences in
PyTorch, inference buffers and int8 GEMMs. Nothing here imports the models."""
