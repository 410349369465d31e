"""The inverse forms of linear attention with decay (SPEC §2): families ``la-solve-v`` (Type1),
``la-solve-k`` (Type2) and ``la-solve-q`` (Type3), in :mod:`.solve_v`, :mod:`.solve_k`, :mod:`.solve_q`;
cases in :mod:`.cases`, properties in :mod:`.checks`, the solvability map in :mod:`.solvability`."""
