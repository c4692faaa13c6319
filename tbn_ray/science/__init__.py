"""The science: data, models, attacks, training, test-time BN statistics, randomized smoothing
and the corruption algorithms. Plain torch and numpy; nothing here imports Ray."""
