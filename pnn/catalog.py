"""Names of the registered rules, devices and datasets, for help texts.

Kept free of heavy imports so that ``pnn --help`` stays fast; a test checks these lists against
the real registries.
"""

RULE_NAMES = (
    "bp", "pat", "fa", "dfa", "ifa", "adfa", "dtp",
    "wp", "np", "spsa", "mgd",
    "local-direct", "local-recon", "local-contrast", "local-predict", "local-pseudo",
    "ep", "coupled",
    "noprop-dt", "noprop-ct", "noprop-fm",
)
DEVICE_NAMES = ("crossbar", "resistive", "mzi", "diffractive", "digital")
DATASET_NAMES = ("vowels", "mnist")
FEEDBACK_NAMES = ("random", "identity", "physical", "learned")
