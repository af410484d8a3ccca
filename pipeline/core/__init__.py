"""What every stage shares: the error boundary, atomic files, progress lines, devices, the frozen config
and the registries it names (learning-rate schedules, TTA view sets).
"""
