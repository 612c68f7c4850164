"""simulators: a simulated specimen and microscope with exact ground truth.

``samples`` (populations, materials, imaging defaults), ``shapes`` (projected thickness and
exact measures of spheres, capsules, rods and superellipse cubes), ``specimen`` (a lazily drawn
120 × 120 µm grid with smooth density and focus maps), ``render`` (anti-aliased patches, blur,
film, illumination, shot noise), ``truth`` (the per-frame truth file), ``scope`` (``SimScope``:
stage, focus, modes, clock) and ``cli`` (``particlewatch simulate``). Nothing is imported here so
that ``import particlewatch.simulators`` stays cheap.
"""
