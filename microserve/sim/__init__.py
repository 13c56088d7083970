"""`microserve sim`: strategies on simulated clusters in virtual time (in progress).

`costs` is the roofline cost model and its hardware / model profiles (`profiles/*.json`).
"""
