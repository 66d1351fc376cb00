"""Layer 2: what a recipe is: config markers, the stage contract and registry, the recipe model, key locations, paths, loops, the graph and its input kinds, artifacts."""
