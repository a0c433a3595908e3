"""What identifies a patient in the outputs people share: figures, reports and exported datasets."""

from __future__ import annotations

from pydantic import Field

from medsynth.config.base import StrictModel


class PrivacyConfig(StrictModel):
    """Pseudonymisation of case and patient ids in shared outputs.

    The tracking store holds the figures and reports of every run (real images among them) and exports
    are handed to other people; source ids such as ``TCGA_CS_4941_19`` name the patient. With
    ``pseudonymise_ids`` every id drawn in a figure, written to a logged report or used as a file name
    or provenance column of an export is replaced by a keyed pseudonym (HMAC-SHA256 of the id under a
    secret key: stable across runs, not reversible without the key, not guessable from known ids). The
    key comes from the ``key_env`` environment variable, else from a file created once with a random
    key at ``<output_dir>/<name>/privacy/pseudonym.key`` (mode 0600); the id -> pseudonym table is kept
    next to it (``pseudonyms.csv``) and is never logged or exported.
    """

    pseudonymise_ids: bool = Field(
        False, description="Replace case/patient ids by keyed pseudonyms in figures, logged reports and exports."
    )
    key_env: str = Field(
        "MEDSYNTH_PSEUDONYM_KEY",
        description="Environment variable holding the pseudonym key (any string; share it to get the same "
        "pseudonyms on another machine). Unset: a random key kept in <output_dir>/<name>/privacy/.",
    )
    prefix: str = Field("anon", pattern=r"^[A-Za-z][A-Za-z0-9]*$", description="Pseudonyms read '<prefix>-<12 hex>'.")
