"""The paper's experiments, as functions the ``gradand`` command line and the tests call."""
