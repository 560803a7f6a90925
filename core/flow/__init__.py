"""Optical flow: estimation between neighbouring frames (:mod:`reelflow.core.flow.estimate`), warping by a
flow and occlusion from forward-backward consistency (:mod:`reelflow.core.flow.warp`)."""
