"""Names and numbers shared across hpvade."""

#: Every signature column and every (pseudo)bulk row is scaled to this total (counts per million).
CPM_SCALE = 1e6

#: Extra registry key for the optional raw-count layer (scvi-tools' keys cover X and labels).
COUNTS_KEY = "counts"

#: Keys of the tensors that pair a minibatch of pseudobulks with a minibatch of cells.
BULK_KEY = "bulk"
BULK_PROPORTIONS_KEY = "bulk_proportions"

#: Where results are written on the user's AnnData.
PROPORTIONS_KEY = "hpvade_proportions"
FIT_SCORE_KEY = "hpvade_fit_score"
PSEUDOBULK_PROPORTIONS_KEY = "proportions"
PSEUDOBULK_RNA_PROPORTIONS_KEY = "rna_proportions"
UNEXPLAINED_KEY = "hpvade_unexplained"
UNEXPLAINED_SCORE_KEY = "hpvade_unexplained_score"
UNKNOWN_FRACTION_KEY = "hpvade_unknown_fraction"  # the lower bound's old name, until 0.4
UNKNOWN_LOWER_BOUND_KEY = "hpvade_unknown_lower_bound"
UNKNOWN_MAP_KEY = "hpvade_unknown_map"
#: The column of the whole sample's fractions that holds the cells the reference lacks.
UNKNOWN_COLUMN = "unknown"
GENE_REPORT_KEY = "hpvade_gene_report"
ESTIMATOR_KEY = "hpvade_estimator"

#: Names of the loss terms, as logged (``<name>_train`` / ``<name>_validation``).
LOSS_TERMS = ("reconstruction_loss", "kl_local", "prototype_loss", "bulk_loss", "proportion_loss")
