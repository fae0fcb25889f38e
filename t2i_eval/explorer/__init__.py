"""The explorer: browse runs side by side.

- `rows`: find runs, pair two runs by (prompt, seed), filter and page rows (no Gradio, no HTML);
- `render`: those rows, the runs' facts and the live tab's result as HTML;
- `app`: the Gradio page and its server (`t2i-eval explore`, `app.py`).

Nothing is imported here, so `import t2i_eval.explorer.rows` never loads Gradio.
"""
