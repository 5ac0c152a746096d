from gconv_rewrite.cli import entry

entry()
