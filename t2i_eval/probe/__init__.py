"""Trained prompt guards: a small head (probe) on a frozen text encoder.

`encoders` (minilm, st:, clip-text:), `heads` (linear, mlp), `train` (`train_probe`, `Probe`,
`load_probe`), `counterexamples` (benign hard negatives), `card` (guard.json, training overlap),
`command` (`t2i-eval train-guard`); `loso` and `matrix` (leave-one-source-out). Importing the
package imports nothing heavy: the CLI builds its parser from `command` at start-up.
"""
