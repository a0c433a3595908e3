"""medsynth: mask-conditioned MRI synthesis (preprocess, train, synthesise, validate, experiment).

``__version__`` is the one place the version lives (pyproject reads it; ``medsynth --version`` prints it).
"""

__version__ = "0.1.0"
