"""particlewatch: acquisition and live size analysis for nanoparticle electron microscopy.

The data path reads in folder order: ``simulators`` (a simulated microscope) ->
``acquisition`` (plans that drive a microscope and save frames) -> frames on disk ->
``daemon`` (watches the folder, analyses each new frame, streams statistics) -> ``analysis``
(segment, separate, measure, populations, statistics) -> dashboard and stop signal.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
