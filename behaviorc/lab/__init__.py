"""The lab: the testbed's scoring and the experiments. Nothing in a build imports it."""
