"""ptp-mini: a miniature InternVL2 trained on ``ptp_cli.synth`` scenes: its definition (``model``) and its shipped
weights (``checkpoint/``, package data that ``ptp_cli.zoo`` serves as ``--model mini``). The training code is not
part of the package: it lives in the repository's ``training/`` folder."""
