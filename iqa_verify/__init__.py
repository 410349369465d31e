"""iqa-verify: property-based verification of attention kernels."""
