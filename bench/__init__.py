"""Load generator and benchmark for the LSTM server (`make bench`)."""
