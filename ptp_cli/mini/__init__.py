"""ptp-mini: a miniature InternVL2 trained on ``ptp_cli.synth`` scenes (model, training, evaluation, shipping)."""
