from gconv_rewrite.cli import main

main()
