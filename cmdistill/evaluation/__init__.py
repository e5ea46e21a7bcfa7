"""Evaluation: sample sets from students and teachers, feature networks and FID, the report and its pictures.
Builds on the core and the export layer."""
