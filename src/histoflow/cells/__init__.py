"""Single-cell tables: quantification, gating, phenotypes."""
from histoflow.cells.gating import CellsError, GatingWarning, gate, gating_table
from histoflow.cells.rules import ExpressionError, RuleError, RuleTable, Step, list_presets, load_preset
from histoflow.cells.splits import patient_folds

__all__ = ["CellsError", "GatingWarning", "gate", "gating_table", "RuleTable", "Step", "RuleError", "ExpressionError",
           "load_preset", "list_presets", "patient_folds"]
