"""Evaluation of exported models with lm-evaluation-harness (``pip install -e ".[eval]"``).

Importing :mod:`zeda_lightning.evaluation.harness` registers the ``zeda`` model with lm-eval; it is kept out of this
package's import so ``zeda_lightning`` does not need lm-eval installed.
"""
