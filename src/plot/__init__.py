"""Figures and summary tables read from stage-output folders."""
