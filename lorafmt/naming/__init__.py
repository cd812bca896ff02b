"""Name arithmetic shared by layouts: kohya flattening, SGM/LDM <-> diffusers U-Net names, CLIP spellings.

Layouts never import each other; what two layouts both need lives here.
"""
