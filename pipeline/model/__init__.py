"""Models: the architecture registry (smp and FCN-8s), pretrained encoder weights and their offline
check (`make weights`), and the losses.
"""
