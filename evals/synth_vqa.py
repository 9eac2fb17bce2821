"""Write a few synthetic visual-QA examples as PNGs with their questions (the generator is ``vtprune.synth``).

    python evals/synth_vqa.py --out /tmp/synth --split heldout --n 10
"""

from vtprune.synth import main

if __name__ == "__main__":
    main()
