"""What a finished run is worth and how it is used: the report, calibration, figures, predict."""
