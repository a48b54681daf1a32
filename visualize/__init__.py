"""Looking at LVLM_CSP: token maps (the paper's Figure 5) and sweep / benchmark plots."""
