"""Names of the registered rules, devices and datasets, for help texts.

Kept free of heavy imports so that ``pnn --help`` stays fast; a test checks these lists against
the real registries.
"""

RULE_NAMES = ("bp", "pat", "fa", "dfa", "ifa", "adfa", "dtp")
DEVICE_NAMES = ("crossbar", "digital")
DATASET_NAMES = ("vowels", "mnist")
FEEDBACK_NAMES = ("random", "identity", "physical", "learned")
